/* onnxruntime custom op "edgelmm.MatMulNBits": MatMulNBits (4-bit, accuracy level 4) on q4_gemm/q4_gemv.
   Declares only the parts of onnxruntime's C API it calls: OrtApi is a table of function pointers whose
   slots never move (the header appends only), so each is reached by its slot number. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

void q4_quantize_rows(int m0, int m1, int K, int bs, const float *A, int8_t *Aq, float *as, int32_t *asum);
void q4_gemm(int M, int N, int K, int bs, int n_begin, int n_end, const int8_t *Aq, const float *as,
             const int32_t *asum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
             float *C, uint8_t *scratch);
void q4_gemv_prepare(int K, int bs, const int8_t *aq, const float *as, const int32_t *asum_unused,
                     int8_t *ag, float *lane_scale, float *lane_zsum);
void q4_gemv(int K, int bs, int n_begin, int n_end, const int8_t *ag, const float *lane_scale,
             const float *lane_zsum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
             float *y);
extern const size_t q4_scratch_bytes;

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtShape;
typedef void *OrtApiSlot;
typedef struct { const OrtApiSlot *(*GetApi)(uint32_t version); const char *(*GetVersionString)(void); } OrtApiBase;

enum { SLOT_CREATE_STATUS = 0, SLOT_CREATE_DOMAIN = 26, SLOT_DOMAIN_ADD = 27, SLOT_ADD_DOMAIN = 28,
       SLOT_MUTABLE_DATA = 51, SLOT_ELEMENT_TYPE = 60, SLOT_DIMS_COUNT = 61, SLOT_DIMS = 62,
       SLOT_TYPE_AND_SHAPE = 65, SLOT_ATTR_INT64 = 86, SLOT_INPUT_COUNT = 88, SLOT_INPUT = 90, SLOT_OUTPUT = 91,
       SLOT_RELEASE_STATUS = 93, SLOT_RELEASE_SHAPE = 99, SLOT_PARALLEL_FOR = 274 };
enum { T_FLOAT = 1, T_UINT8 = 2, T_INT32 = 6 };
enum { REQUIRED = 0, OPTIONAL = 1 };
#define API_VERSION 16   /* CreateKernelV2 / KernelComputeV2; ParallelFor needs a runtime of API >= 17 */

static const OrtApiSlot *api;
#define CALL(slot, type, ...) (((type)api[slot])(__VA_ARGS__))
typedef OrtStatus *(*status_fn)();

typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, const OrtApiSlot *, const OrtKernelInfo *);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *, OrtKernelContext *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, const OrtApiSlot *, const OrtKernelInfo *, void **);
    OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
} OrtCustomOp;

typedef struct { int K, N, bs; } Q4Node;

static OrtStatus *error(const char *msg) {
    return CALL(SLOT_CREATE_STATUS, OrtStatus *(*)(int, const char *), 1, msg);
}

#define CHECK(expr) do { OrtStatus *s_ = (expr); if (s_) return s_; } while (0)

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApiSlot *a, const OrtKernelInfo *info, void **out) {
    (void)op; (void)a;
    int64_t K, N, bits, bs, level;
    typedef OrtStatus *(*attr_fn)(const OrtKernelInfo *, const char *, int64_t *);
    CHECK(CALL(SLOT_ATTR_INT64, attr_fn, info, "K", &K));
    CHECK(CALL(SLOT_ATTR_INT64, attr_fn, info, "N", &N));
    CHECK(CALL(SLOT_ATTR_INT64, attr_fn, info, "bits", &bits));
    CHECK(CALL(SLOT_ATTR_INT64, attr_fn, info, "block_size", &bs));
    if (CALL(SLOT_ATTR_INT64, attr_fn, info, "accuracy_level", &level)) level = 0;
    if (bits != 4 || bs < 16 || bs > 4096 || (bs & (bs - 1)) || K % bs || K % 8 || N < 1 || K > (1 << 24) || N > (1 << 24))
        return error("edgelmm.MatMulNBits: needs bits=4, a power-of-2 block_size >= 16 dividing K");
    Q4Node *node = malloc(sizeof *node);
    if (!node) return error("edgelmm.MatMulNBits: out of memory");
    node->K = (int)K; node->N = (int)N; node->bs = (int)bs;
    *out = node;
    return 0;
}

typedef struct {
    const Q4Node *node;
    int M, tasks;
    const float *A, *scales, *bias;
    const uint8_t *B, *zp;
    float *C, *as, *lane_scale, *lane_zsum;
    int8_t *Aq, *ag;
    int32_t *asum;
    int failed;
} Work;

static void range(int total, int tasks, int i, int unit, int *b, int *e) {
    int units = (total + unit - 1) / unit;
    *b = (int)((int64_t)units * i / tasks) * unit;
    *e = (int)((int64_t)units * (i + 1) / tasks) * unit;
    if (*e > total) *e = total;
}

static void quantize_task(void *p, size_t i) {
    Work *w = p; int b, e;
    range(w->M, w->tasks, (int)i, 1, &b, &e);
    q4_quantize_rows(b, e, w->node->K, w->node->bs, w->A, w->Aq, w->as, w->asum);
}

static void gemm_task(void *p, size_t i) {
    Work *w = p; int b, e;
    range(w->node->N, w->tasks, (int)i, 16, &b, &e);
    if (b >= e) return;
    uint8_t *scratch = aligned_alloc(64, q4_scratch_bytes);
    if (!scratch) { w->failed = 1; return; }
    q4_gemm(w->M, w->node->N, w->node->K, w->node->bs, b, e, w->Aq, w->as, w->asum, w->B, w->scales, w->zp,
            w->bias, w->C, scratch);
    free(scratch);
}

static void gemv_task(void *p, size_t i) {
    Work *w = p; int b, e;
    range(w->node->N, w->tasks, (int)i, 4, &b, &e);
    if (b < e)
        q4_gemv(w->node->K, w->node->bs, b, e, w->ag, w->lane_scale, w->lane_zsum, w->B, w->scales,
                w->zp, w->bias, w->C);
}

typedef OrtStatus *(*input_fn)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*data_fn)(const OrtValue *, void **);
typedef OrtStatus *(*shape_fn)(const OrtValue *, OrtShape **);
typedef OrtStatus *(*parallel_fn)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);

/* The input's data, element type and dims (dims may be NULL); a missing optional input gives NULL data. */
static OrtStatus *input(OrtKernelContext *ctx, size_t count, size_t i, int type, void **data, int64_t *dims, size_t *rank) {
    const OrtValue *v = 0;
    *data = 0;
    if (i >= count) return 0;
    CHECK(CALL(SLOT_INPUT, input_fn, ctx, i, &v));
    if (!v) return 0;
    OrtShape *shape;
    CHECK(CALL(SLOT_TYPE_AND_SHAPE, shape_fn, v, &shape));
    int elem = 0; size_t r = 0;
    OrtStatus *s = CALL(SLOT_ELEMENT_TYPE, OrtStatus *(*)(const OrtShape *, int *), shape, &elem);
    if (!s) s = CALL(SLOT_DIMS_COUNT, OrtStatus *(*)(const OrtShape *, size_t *), shape, &r);
    if (!s && dims && r <= 8) s = CALL(SLOT_DIMS, OrtStatus *(*)(const OrtShape *, int64_t *, size_t), shape, dims, r);
    CALL(SLOT_RELEASE_SHAPE, void (*)(OrtShape *), shape);
    if (s) return s;
    if (elem != type || (dims && r > 8)) return error("edgelmm.MatMulNBits: unexpected input type or rank");
    if (rank) *rank = r;
    return CALL(SLOT_MUTABLE_DATA, data_fn, v, data);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Q4Node *node = kernel;
    size_t count = 0, rank = 0;
    int64_t dims[8];
    void *A, *B, *scales, *zp, *gidx, *bias;
    CHECK(CALL(SLOT_INPUT_COUNT, OrtStatus *(*)(const OrtKernelContext *, size_t *), ctx, &count));
    CHECK(input(ctx, count, 0, T_FLOAT, &A, dims, &rank));
    CHECK(input(ctx, count, 1, T_UINT8, &B, 0, 0));
    CHECK(input(ctx, count, 2, T_FLOAT, &scales, 0, 0));
    CHECK(input(ctx, count, 3, T_UINT8, &zp, 0, 0));
    CHECK(input(ctx, count, 4, T_INT32, &gidx, 0, 0));
    CHECK(input(ctx, count, 5, T_FLOAT, &bias, 0, 0));
    if (gidx) return error("edgelmm.MatMulNBits: g_idx is not supported");
    if (rank < 1 || dims[rank - 1] != node->K) return error("edgelmm.MatMulNBits: A's last dimension is not K");
    int64_t M = 1;
    for (size_t i = 0; i + 1 < rank; i++) M *= dims[i];
    dims[rank - 1] = node->N;
    OrtValue *out;
    CHECK(CALL(SLOT_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **),
               ctx, 0, dims, rank, &out));
    void *C;
    CHECK(CALL(SLOT_MUTABLE_DATA, data_fn, out, &C));
    if (M == 0) return 0;
    const int K = node->K, kb = K / node->bs, chunks = (K + 127) / 128;
    Work w = {node, (int)M, 1, A, scales, bias, B, zp, C, 0, 0, 0, 0, 0, 0, 0};
    w.Aq = malloc((size_t)M * K);
    w.as = malloc((size_t)M * kb * sizeof(float));
    w.asum = malloc((size_t)M * kb * sizeof(int32_t));
    OrtStatus *status = 0;
    if (!w.Aq || !w.as || !w.asum) { status = error("edgelmm.MatMulNBits: out of memory"); goto done; }
    parallel_fn parallel = (parallel_fn)api[SLOT_PARALLEL_FOR];
    w.tasks = M >= 64 ? 8 : 1;
    if (w.tasks > 1) status = parallel(ctx, quantize_task, w.tasks, w.tasks, &w);
    else quantize_task(&w, 0);
    if (status) goto done;
    if (M == 1) {
        w.ag = malloc((size_t)chunks * 128);
        w.lane_scale = malloc((size_t)chunks * 16 * sizeof(float));
        w.lane_zsum = malloc((size_t)chunks * 16 * sizeof(float));
        if (!w.ag || !w.lane_scale || !w.lane_zsum) { status = error("edgelmm.MatMulNBits: out of memory"); goto done; }
        q4_gemv_prepare(K, node->bs, w.Aq, w.as, w.asum, w.ag, w.lane_scale, w.lane_zsum);
        w.tasks = node->N >= 256 ? 8 : 1;
        status = parallel(ctx, gemv_task, w.tasks, w.tasks, &w);
    } else {
        w.tasks = node->N >= 256 ? 8 : 1;
        status = parallel(ctx, gemm_task, w.tasks, w.tasks, &w);
        if (!status && w.failed) status = error("edgelmm.MatMulNBits: out of memory");
    }
done:
    free(w.Aq); free(w.as); free(w.asum); free(w.ag); free(w.lane_scale); free(w.lane_zsum);
    return status;
}

static void destroy(void *kernel) { free(kernel); }
static const char *op_name(const OrtCustomOp *op) { (void)op; return "MatMulNBits"; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static const int input_types[6] = {T_FLOAT, T_UINT8, T_FLOAT, T_UINT8, T_INT32, T_FLOAT};
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i < 6 ? input_types[i] : 0; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 6; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }
static int input_characteristic(const OrtCustomOp *op, size_t i) { (void)op; return i < 3 ? REQUIRED : OPTIONAL; }
static int output_characteristic(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int input_memory(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }

static OrtCustomOp q4_op = {
    .version = API_VERSION, .GetName = op_name, .GetExecutionProviderType = op_provider,
    .GetInputType = input_type, .GetInputTypeCount = input_count, .GetOutputType = output_type,
    .GetOutputTypeCount = output_count, .KernelDestroy = destroy, .GetInputCharacteristic = input_characteristic,
    .GetOutputCharacteristic = output_characteristic, .GetInputMemoryType = input_memory,
    .CreateKernelV2 = create_kernel, .KernelComputeV2 = compute,
};

/* Entry point of SessionOptions.register_custom_ops_library: adds domain "edgelmm" with MatMulNBits. */
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    api = base->GetApi(20);
    if (!api) return 0;  /* no status can be made without the API; registration is skipped */
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512vl") ||
        !__builtin_cpu_supports("avx512dq"))
        return error("edgelmm.MatMulNBits needs AVX512-VNNI");
    OrtCustomOpDomain *domain;
    CHECK(CALL(SLOT_CREATE_DOMAIN, OrtStatus *(*)(const char *, OrtCustomOpDomain **), "edgelmm", &domain));
    CHECK(CALL(SLOT_DOMAIN_ADD, OrtStatus *(*)(OrtCustomOpDomain *, const OrtCustomOp *), domain, &q4_op));
    return CALL(SLOT_ADD_DOMAIN, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *), options, domain);
}
