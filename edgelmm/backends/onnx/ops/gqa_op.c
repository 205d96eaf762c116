/* edgelmm.GroupQueryAttention: com.microsoft GroupQueryAttention for one sequence on CPU (fp32), on
   gqa_kernels.c; edgelmm.GroupQueryAttentionHalfCache: the same over an fp16 cache (past/present fp16);
   edgelmm.GroupQueryAttentionInt8Cache: over an int8 cache, past/present int8 [1, Hkv, P, D + 4], each row's
   D values quantized symmetrically with its fp32 scale in the last 4 bytes. Inputs as the original: query
   [1, S, Hq*D] (or packed q|k|v when key/value are absent), key, value [1, S, Hkv*D], past_key/past_value
   [1, Hkv, P, D] (P may be the whole preallocated buffer, bound as present too: the new rows are written in
   place), seqlens_k [1] (total - 1), total_sequence_length, cos/sin caches [max_pos, rotary_dim/2] when
   do_rotary.
   edgelmm.QkvGroupQueryAttention(HalfCache|Int8Cache): the packed q|k|v projection (a MatMulNBits, as
   matmul_op.c) and the attention as one op: inputs x [1, S, K], the projection's B, scales, zero points, g_idx,
   bias, then the attention's past_key .. sin; attributes the attention's and the projection's K, N, bits,
   block_size. A prompt's q|k|v rows ([S, N] fp32; for Phi-2, N = 7680: 400 tokens x 7680 x 4 bytes = 12 MB)
   are made a few kv heads' columns at a time (QKV_GROUP_BYTES), each group attended as it is made. */
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "nbits_op.h"
#include "ort_api.h"


#define ROWS_PER_TASK 64
#define QKV_GROUP_BYTES (2 << 20)  /* a prompt's q|k|v columns made at a time (at least 64 columns of each) */

typedef struct {
    OrtAllocator *alloc;  /* first (op_kernel_create) */
    int heads, kv_heads, rotary, format, fused;
    float scale;
    Linear qkv;
} Node;

static int cache_format(const OrtCustomOp *op) {
    return op == &group_query_attention_half_cache_op || op == &qkv_group_query_attention_half_cache_op ? CACHE_FP16
           : op == &group_query_attention_int8_cache_op || op == &qkv_group_query_attention_int8_cache_op ? CACHE_INT8
                                                                                                    : CACHE_FP32;
}

static int is_fused(const OrtCustomOp *op) {
    return op == &qkv_group_query_attention_op || op == &qkv_group_query_attention_half_cache_op ||
           op == &qkv_group_query_attention_int8_cache_op;
}

static int format_type(int format) { return format == CACHE_FP16 ? T_FLOAT16 : format == CACHE_INT8 ? T_INT8 : T_FLOAT; }

static OrtStatus *create(const OrtCustomOp *op, const OrtApiSlot *api, const OrtKernelInfo *info, void **out) {
    (void)api;
    const int64_t heads = op_attr_int(info, "num_heads", 0), kv_heads = op_attr_int(info, "kv_num_heads", 0);
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || op_attr_int(info, "rotary_interleaved", 0) ||
        op_attr_int(info, "local_window_size", -1) != -1 || op_attr_float(info, "softcap", 0.f) != 0.f ||
        op_attr_int(info, "smooth_softmax", 0) || op_attr_int(info, "qk_output", 0))
        return op_error("edgelmm.GroupQueryAttention: unsupported attributes");
    Node n = {.heads = (int)heads, .kv_heads = (int)kv_heads, .rotary = (int)op_attr_int(info, "do_rotary", 0),
              .format = cache_format(op), .fused = is_fused(op), .scale = op_attr_float(info, "scale", 0.f)};
    if (n.fused) {
        CHECK(linear(op_attr_int(info, "K", 0), op_attr_int(info, "N", 0), op_attr_int(info, "bits", 0),
                     op_attr_int(info, "block_size", 0), 0, &n.qkv));
        if (n.qkv.N % (heads + 2 * kv_heads)) return op_error("edgelmm.QkvGroupQueryAttention: N is not (H + 2 Hkv) D");
    }
    CHECK(op_kernel_create(info, sizeof(Node), out));
    Node *node = *out;
    n.alloc = node->alloc;
    *node = n;
    return 0;
}

/* One call's attention: heads [h0, h0 + heads) and their kv heads from kv0, query rows of stride q_stride at q
   (column 0 = head h0), new keys/values at k/v + k_offset/v_offset (column 0 = kv head kv0), rows kv_stride. */
typedef struct {
    const Node *node;
    int S, D, past, rows_len, q_stride, k_offset, v_offset, kv_stride, rotary_dim, tasks_per_head, h0, kv0;
    const float *q, *k, *v, *cos, *sin;
    void *present_k, *present_v;
    float *out, scale;
    int failed;
} Work;

/* The new keys (rotated) and values of kv head kv0 + i, written into the cache at positions past..past+S-1. */
static void append_task(void *p, size_t i) {
    Work *w = p;
    const int D = w->D, half = w->rotary_dim / 2;
    float row[MAX_HEAD_DIM];
    for (int s = 0; s < w->S; s++) {
        const int pos = w->past + s;
        const size_t at = (size_t)(w->kv0 + i) * w->rows_len + pos;  /* cache row */
        const float *ks = w->k + (size_t)s * w->kv_stride + w->k_offset + i * D;
        if (w->rotary_dim) gqa_rotate(ks, row, D, w->rotary_dim, w->cos + (size_t)pos * half, w->sin + (size_t)pos * half, 1.f);
        gqa_store_row(w->present_k, at, w->rotary_dim ? row : ks, D, w->node->format);
        gqa_store_row(w->present_v, at, w->v + (size_t)s * w->kv_stride + w->v_offset + i * D, D, w->node->format);
    }
}

/* Query rows [r0, r0+64) of head h0 + t / tasks_per_head attend over the cache. */
static void attend_task(void *p, size_t t) {
    Work *w = p;
    const int hl = (int)t / w->tasks_per_head, h = w->h0 + hl, D = w->D;
    const int r0 = (int)(t % w->tasks_per_head) * ROWS_PER_TASK, half = w->rotary_dim / 2;
    const int rows = w->S - r0 < ROWS_PER_TASK ? w->S - r0 : ROWS_PER_TASK;
    const int kvh = h / (w->node->heads / w->node->kv_heads);
    float *q = op_alloc(w->node->alloc, sizeof(float) * ROWS_PER_TASK * ((D + 15) / 16) * 16);
    if (!q) { __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED); return; }
    for (int r = 0; r < rows; r++) {
        const int pos = w->past + r0 + r;
        const float *src = w->q + (size_t)(r0 + r) * w->q_stride + hl * D;
        if (w->rotary_dim) gqa_rotate(src, q + r * D, D, w->rotary_dim, w->cos + (size_t)pos * half, w->sin + (size_t)pos * half, w->scale);
        else for (int d = 0; d < D; d++) q[r * D + d] = src[d] * w->scale;
    }
    const size_t cache = (size_t)kvh * w->rows_len * cache_row_bytes(D, w->node->format);
    gqa_attend(rows, w->past + r0, D, q, (char *)w->present_k + cache, (char *)w->present_v + cache,
               w->out + (size_t)r0 * w->node->heads * D + h * D, w->node->heads * D, w->node->format);
    op_free(w->node->alloc, q);
}

/* Appends the new keys/values of kv heads [kv0, kv0 + kv_count), then attends with their query heads. */
static OrtStatus *attend_heads(OrtKernelContext *ctx, Work *w, int kv0, int kv_count) {
    const int group = w->node->heads / w->node->kv_heads;
    w->kv0 = kv0;
    w->h0 = kv0 * group;
    CHECK(op_parallel(ctx, append_task, (size_t)kv_count, w));
    CHECK(op_parallel(ctx, attend_task, (size_t)kv_count * group * w->tasks_per_head, w));
    return w->failed ? op_error("edgelmm.GroupQueryAttention: out of memory") : 0;
}

static int same_dims(const int64_t *a, size_t ra, const int64_t *b, size_t rb) {
    if (ra != rb) return 0;
    for (size_t i = 0; i < ra; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}


#define INCONSISTENT op_error("edgelmm.GroupQueryAttention: inconsistent inputs (one unpadded sequence only)")

/* The cache and position inputs from `first` (past_key, past_value, seqlens_k, total_sequence_length, cos,
   sin) for S new rows of head size D: the outputs allocated (the past rows carried over unless the cache is
   shared), *w filled but for the new rows' q/k/v. */
static OrtStatus *prepare(OrtKernelContext *ctx, const Node *node, size_t first, int S, int64_t D, Work *w) {
    const int Hkv = node->kv_heads;
    int64_t pkd[8], pvd[8], cd[8], sd[8];
    size_t pkr = 0, pvr = 0, cr = 0, sr = 0;
    void *pk, *pv, *seqlens, *total, *cos, *sin;
    const int cache_type = format_type(node->format);
    CHECK(op_input(ctx, first, cache_type, &pk, pkd, &pkr));
    CHECK(op_input(ctx, first + 1, cache_type, &pv, pvd, &pvr));
    CHECK(op_input_sized(ctx, first + 2, T_INT32, &seqlens, 1));
    CHECK(op_input_sized(ctx, first + 3, T_INT32, &total, 1));
    CHECK(op_input(ctx, first + 4, T_FLOAT, &cos, cd, &cr));
    CHECK(op_input(ctx, first + 5, T_FLOAT, &sin, sd, &sr));
    const int T = *(const int32_t *)total, past = T - S;
    if (D < 1 || D > MAX_HEAD_DIM || !pk != !pv) return INCONSISTENT;
    const int64_t row_width = node->format == CACHE_INT8 ? D + 4 : D;  /* elements per cache row */
    if (pk && (pkr != 4 || pkd[0] != 1 || pkd[1] != Hkv || pkd[3] != row_width || !same_dims(pkd, pkr, pvd, pvr)))
        return INCONSISTENT;
    const int P = pk ? (int)pkd[2] : 0;
    if (((const int32_t *)seqlens)[0] != T - 1 || past < 0 || P < past) return INCONSISTENT;
    const int rotary_dim = node->rotary && cos ? (int)cd[1] * 2 : 0;
    if (node->rotary && (!cos || !sin || cr != 2 || cd[0] < T || !same_dims(cd, cr, sd, sr) || rotary_dim > D))
        return op_error("edgelmm.GroupQueryAttention: the rotary caches do not cover these positions");
    const int L = P > T ? P : T;
    int64_t out_dims[3] = {1, S, (int64_t)node->heads * D}, cache_dims[4] = {1, Hkv, L, row_width};
    const size_t row_bytes = cache_row_bytes((int)D, node->format);
    void *out, *present_k, *present_v;
    CHECK(op_output(ctx, 0, out_dims, 3, &out));
    CHECK(op_output(ctx, 1, cache_dims, 4, &present_k));
    CHECK(op_output(ctx, 2, cache_dims, 4, &present_v));
    for (int i = 0; past && i < Hkv; i++) {  /* a cache not shared with its past: carry the past rows over */
        if (present_k != pk)
            memcpy((char *)present_k + (size_t)i * L * row_bytes, (char *)pk + (size_t)i * P * row_bytes, row_bytes * past);
        if (present_v != pv)
            memcpy((char *)present_v + (size_t)i * L * row_bytes, (char *)pv + (size_t)i * P * row_bytes, row_bytes * past);
    }
    *w = (Work){.node = node, .S = S, .D = (int)D, .past = past, .rows_len = L, .rotary_dim = rotary_dim,
                .cos = cos, .sin = sin, .present_k = present_k, .present_v = present_v, .out = out,
                .scale = node->scale != 0.f ? node->scale : 1.f / sqrtf((float)D),
                .tasks_per_head = (S + ROWS_PER_TASK - 1) / ROWS_PER_TASK};
    return 0;
}

static OrtStatus *attention_compute(const Node *node, OrtKernelContext *ctx) {
    const int H = node->heads, Hkv = node->kv_heads;
    int64_t qd[8], kd[8], vd[8];
    size_t qr = 0, kr = 0, vr = 0;
    void *q, *k, *v;
    CHECK(op_input(ctx, 0, T_FLOAT, &q, qd, &qr));
    CHECK(op_input(ctx, 1, T_FLOAT, &k, kd, &kr));
    CHECK(op_input(ctx, 2, T_FLOAT, &v, vd, &vr));
    if (qr != 3 || qd[0] != 1) return op_error("edgelmm.GroupQueryAttention: one sequence (batch 1) only");
    const int packed = !k, S = (int)qd[1];
    const int64_t width = qd[2], D = width / (packed ? H + 2 * Hkv : H);
    if (!k != !v || D < 1 || width != D * (packed ? H + 2 * Hkv : H)) return INCONSISTENT;
    if (!packed && (kr != 3 || kd[0] != 1 || kd[1] != S || kd[2] != Hkv * D || !same_dims(kd, kr, vd, vr)))
        return INCONSISTENT;
    Work w;
    CHECK(prepare(ctx, node, 3, S, D, &w));
    w.q = q;
    w.k = packed ? q : k;
    w.v = packed ? q : v;
    w.q_stride = (int)width;
    w.kv_stride = packed ? (int)width : Hkv * (int)D;
    w.k_offset = packed ? H * (int)D : 0;
    w.v_offset = packed ? (H + Hkv) * (int)D : 0;
    return attend_heads(ctx, &w, 0, Hkv);
}

/* kv heads per group of q|k|v columns made at a time: all for a short prompt (or a head size that is not a
   multiple of 16, the GEMM's column granularity), else a count whose columns are whole 64-column GEMM
   tiles, as many as QKV_GROUP_BYTES hold (at least one such count). */
static int kv_heads_per_group(const Node *node, int S, int D) {
    const int group = node->heads / node->kv_heads, row_bytes = (group + 2) * D * (int)sizeof(float);
    if ((int64_t)S * row_bytes * node->kv_heads <= QKV_GROUP_BYTES || D % 16) return node->kv_heads;
    int step = 1;
    while ((step * D) % 64) step++;  /* 64 / gcd(D, 64) */
    int count = (int)(QKV_GROUP_BYTES / ((int64_t)S * row_bytes)) / step * step;
    count = count < step ? step : count;
    return count < node->kv_heads ? count : node->kv_heads;
}

static OrtStatus *fused_compute(const Node *node, OrtKernelContext *ctx) {
    const Linear *l = &node->qkv;
    const int H = node->heads, Hkv = node->kv_heads, D = l->N / (H + 2 * Hkv), group = H / Hkv;
    int64_t xd[8];
    size_t xr = 0;
    void *x;
    Weights wt;
    CHECK(op_input(ctx, 0, T_FLOAT, &x, xd, &xr));
    if (xr != 3 || xd[0] != 1 || xd[2] != l->K)
        return op_error("edgelmm.QkvGroupQueryAttention: x must be [1, S, K] (one sequence)");
    CHECK(weights(ctx, 1, l, &wt));
    const int S = (int)xd[1];
    Work w;
    CHECK(prepare(ctx, node, 6, S, D, &w));
    if (S == 0) return 0;  /* no new rows: empty output, the cache as it was */
    const int per_group = kv_heads_per_group(node, S, D), q_width = per_group * group * D, kv_width = per_group * D;
    const int width = q_width + 2 * kv_width;  /* a group's q | k | v columns */
    Quantized xq;
    float *made = op_alloc(node->alloc, (size_t)S * width * sizeof(float));
    OrtStatus *status = alloc_quantized(node->alloc, &xq, S, l->K, l->bs) && made ? 0
        : op_error("edgelmm.QkvGroupQueryAttention: out of memory");
    if (!status) status = quantize(ctx, l, S, l->K, x, l->K, xq, l->K);
    w.q = made;
    w.k = w.v = made;
    w.q_stride = w.kv_stride = width;
    for (int kv0 = 0; !status && kv0 < Hkv; kv0 += per_group) {
        const int count = Hkv - kv0 < per_group ? Hkv - kv0 : per_group, qw = count * group * D, kw = count * D;
        /* the group's columns of the projection: its query heads', keys', values' */
        const Columns ranges[3] = {{kv0 * group * D, kv0 * group * D + qw, made},
                                   {H * D + kv0 * D, H * D + kv0 * D + kw, made + qw},
                                   {(H + Hkv) * D + kv0 * D, (H + Hkv) * D + kv0 * D + kw, made + qw + kw}};
        status = multiply_ranges(ctx, node->alloc, l, &wt, S, &xq, ranges, 3, width);
        w.k_offset = qw;
        w.v_offset = qw + kw;
        if (!status) status = attend_heads(ctx, &w, kv0, count);
    }
    free_quantized(node->alloc, &xq);
    op_free(node->alloc, made);
    return status;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Node *node = kernel;
    return node->fused ? fused_compute(node, ctx) : attention_compute(node, ctx);
}

static const char *name(const OrtCustomOp *op) { (void)op; return "GroupQueryAttention"; }
static const char *half_cache_name(const OrtCustomOp *op) { (void)op; return "GroupQueryAttentionHalfCache"; }
static const char *int8_cache_name(const OrtCustomOp *op) { (void)op; return "GroupQueryAttentionInt8Cache"; }
static const char *qkv_name(const OrtCustomOp *op) { (void)op; return "QkvGroupQueryAttention"; }
static const char *qkv_half_cache_name(const OrtCustomOp *op) { (void)op; return "QkvGroupQueryAttentionHalfCache"; }
static const char *qkv_int8_cache_name(const OrtCustomOp *op) { (void)op; return "QkvGroupQueryAttentionInt8Cache"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static const int projection_types[5] = {T_UINT8, T_FLOAT, T_UINT8, T_INT32, T_FLOAT};  /* the fused op's 1..5 */
static int input_type(const OrtCustomOp *op, size_t i) {
    if (is_fused(op)) {
        if (i >= 1 && i <= 5) return projection_types[i - 1];
        i = i ? i - 3 : 0;  /* then the attention's inputs from past_key on */
    }
    return i == 5 || i == 6 ? T_INT32 : i == 3 || i == 4 ? format_type(cache_format(op)) : T_FLOAT;
}
static size_t input_count(const OrtCustomOp *op) { return is_fused(op) ? 12 : 9; }
static int output_type(const OrtCustomOp *op, size_t i) {
    return i ? format_type(cache_format(op)) : T_FLOAT;
}
static size_t output_count(const OrtCustomOp *op) { (void)op; return 3; }
static int input_kind(const OrtCustomOp *op, size_t i) {  /* query (x, B, scales), seqlens_k, total_sequence_length */
    if (is_fused(op)) return i <= 2 || i == 8 || i == 9 ? REQUIRED : OPTIONAL;
    return i == 0 || i == 5 || i == 6 ? REQUIRED : OPTIONAL;
}
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int memory_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }

#define GQA_OP(op_name) {                                                                                       \
    .version = OP_API_VERSION, .GetName = op_name, .GetExecutionProviderType = provider, .GetInputType = input_type, \
    .GetInputTypeCount = input_count, .GetOutputType = output_type, .GetOutputTypeCount = output_count,             \
    .KernelDestroy = op_kernel_destroy, .GetInputCharacteristic = input_kind, .GetOutputCharacteristic = output_kind,         \
    .GetInputMemoryType = memory_type, .CreateKernelV2 = create, .KernelComputeV2 = compute}

OrtCustomOp group_query_attention_op = GQA_OP(name);
OrtCustomOp group_query_attention_half_cache_op = GQA_OP(half_cache_name);
OrtCustomOp group_query_attention_int8_cache_op = GQA_OP(int8_cache_name);
OrtCustomOp qkv_group_query_attention_op = GQA_OP(qkv_name);
OrtCustomOp qkv_group_query_attention_half_cache_op = GQA_OP(qkv_half_cache_name);
OrtCustomOp qkv_group_query_attention_int8_cache_op = GQA_OP(qkv_int8_cache_name);
