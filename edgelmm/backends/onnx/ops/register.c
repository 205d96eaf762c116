/* The library's entry point (SessionOptions.register_custom_ops_library) and the glue both ops share. */
#include <stdlib.h>

#include "ort_api.h"

const OrtApiSlot *ort_api;

OrtStatus *op_error(const char *msg) {
    return CALL(SLOT_CREATE_STATUS, OrtStatus *(*)(int, const char *), 1, msg);
}

/* Whether an attribute read succeeded; a failure's status (the attribute is absent) is released. */
static int attr_found(OrtStatus *s) {
    if (s) CALL(SLOT_RELEASE_STATUS, void (*)(OrtStatus *), s);
    return !s;
}

int64_t op_attr_int(const OrtKernelInfo *info, const char *name, int64_t fallback) {
    int64_t value;
    return attr_found(CALL(SLOT_ATTR_INT64, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *), info,
                           name, &value)) ? value : fallback;
}

float op_attr_float(const OrtKernelInfo *info, const char *name, float fallback) {
    float value;
    return attr_found(CALL(SLOT_ATTR_FLOAT, OrtStatus *(*)(const OrtKernelInfo *, const char *, float *), info,
                           name, &value)) ? value : fallback;
}

OrtStatus *op_input(OrtKernelContext *ctx, size_t i, int type, void **data, int64_t *dims, size_t *rank) {
    size_t count = 0;
    const OrtValue *v = 0;
    *data = 0;
    CHECK(CALL(SLOT_INPUT_COUNT, OrtStatus *(*)(const OrtKernelContext *, size_t *), ctx, &count));
    if (i >= count) return 0;
    CHECK(CALL(SLOT_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **), ctx, i, &v));
    if (!v) return 0;
    OrtShape *shape;
    CHECK(CALL(SLOT_TYPE_AND_SHAPE, OrtStatus *(*)(const OrtValue *, OrtShape **), v, &shape));
    int elem = 0;
    size_t r = 0;
    OrtStatus *s = CALL(SLOT_ELEMENT_TYPE, OrtStatus *(*)(const OrtShape *, int *), shape, &elem);
    if (!s) s = CALL(SLOT_DIMS_COUNT, OrtStatus *(*)(const OrtShape *, size_t *), shape, &r);
    if (!s && dims && r <= 8) s = CALL(SLOT_DIMS, OrtStatus *(*)(const OrtShape *, int64_t *, size_t), shape, dims, r);
    CALL(SLOT_RELEASE_SHAPE, void (*)(OrtShape *), shape);
    if (s) return s;
    if (elem != type || (dims && r > 8)) return op_error("edgelmm op: unexpected input type or rank");
    if (rank) *rank = r;
    return CALL(SLOT_MUTABLE_DATA, OrtStatus *(*)(const OrtValue *, void **), v, data);
}

OrtStatus *op_input_sized(OrtKernelContext *ctx, size_t i, int type, void **data, int64_t elements) {
    int64_t dims[8];
    size_t rank = 0;
    CHECK(op_input(ctx, i, type, data, dims, &rank));
    int64_t n = 1;
    for (size_t d = 0; d < rank; d++) n *= dims[d];
    return *data && n == elements ? 0 : op_error("edgelmm op: an input is missing or has the wrong size");
}

/* Output i's data; an absent output (past the node's outputs, or unnamed) errors when required, else NULL. */
static OrtStatus *output_data(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t rank, int required,
                              void **data) {
    size_t count = 0;
    OrtValue *out = 0;
    *data = 0;
    CHECK(CALL(SLOT_OUTPUT_COUNT, OrtStatus *(*)(const OrtKernelContext *, size_t *), ctx, &count));
    if (i < count)
        CHECK(CALL(SLOT_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **),
                   ctx, i, dims, rank, &out));
    if (!out) return required ? op_error("edgelmm op: a required output is missing") : 0;
    return CALL(SLOT_MUTABLE_DATA, OrtStatus *(*)(OrtValue *, void **), out, data);  /* NULL for 0 elements */
}

OrtStatus *op_output(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t rank, void **data) {
    return output_data(ctx, i, dims, rank, 1, data);
}

OrtStatus *op_optional_output(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t rank, void **data) {
    return output_data(ctx, i, dims, rank, 0, data);
}

OrtStatus *op_kernel_create(const OrtKernelInfo *info, size_t size, void **out) {
    OrtAllocator *allocator;
    CHECK(CALL(SLOT_KERNEL_INFO_ALLOCATOR, OrtStatus *(*)(const OrtKernelInfo *, int, OrtAllocator **), info,
               0 /* OrtMemTypeDefault */, &allocator));
    OrtAllocator **kernel = calloc(1, size);
    if (!kernel) {
        CALL(SLOT_RELEASE_ALLOCATOR, void (*)(OrtAllocator *), allocator);
        return op_error("edgelmm op: out of memory");
    }
    *kernel = allocator;
    *out = kernel;
    return 0;
}

void op_kernel_destroy(void *kernel) {
    CALL(SLOT_RELEASE_ALLOCATOR, void (*)(OrtAllocator *), *(OrtAllocator **)kernel);
    free(kernel);
}

void *op_alloc(OrtAllocator *allocator, size_t bytes) { return allocator->Alloc(allocator, bytes); }

void op_free(OrtAllocator *allocator, void *p) {
    if (p) allocator->Free(allocator, p);
}

OrtStatus *op_parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t tasks, void *data) {
    if (tasks <= 1) {
        if (tasks) fn(data, 0);
        return 0;
    }
    return CALL(SLOT_PARALLEL_FOR, OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t,
                                                  void *), ctx, fn, tasks, tasks, data);
}

/* Adds domain "edgelmm" with MatMulNBits, GeluMlpNBits, (Qkv)GroupQueryAttention(HalfCache|Int8Cache) and
   Skip(Simplified)LayerNormalization. The only symbol the library exports. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                    const OrtApiBase *base) {
    ort_api = base->GetApi(RUNTIME_API_VERSION);
    if (!ort_api) {  /* an onnxruntime older than the API this needs: say so with the oldest API */
        ort_api = base->GetApi(1);
        return ort_api ? op_error("edgelmm's ops need onnxruntime 1.20 or newer") : 0;
    }
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512vl") ||
        !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("f16c"))
        return op_error("edgelmm's ops need AVX512-VNNI");
    OrtCustomOpDomain *domain;
    CHECK(CALL(SLOT_CREATE_DOMAIN, OrtStatus *(*)(const char *, OrtCustomOpDomain **), "edgelmm", &domain));
    const OrtCustomOp *ops[] = {&matmul_nbits_op, &gelu_mlp_nbits_op, &group_query_attention_op,
                                &group_query_attention_half_cache_op, &group_query_attention_int8_cache_op,
                                &qkv_group_query_attention_op, &qkv_group_query_attention_half_cache_op,
                                &qkv_group_query_attention_int8_cache_op,
                                &skip_layer_norm_op, &skip_simplified_layer_norm_op};
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++)
        CHECK(CALL(SLOT_DOMAIN_ADD, OrtStatus *(*)(OrtCustomOpDomain *, const OrtCustomOp *), domain, ops[i]));
    return CALL(SLOT_ADD_DOMAIN, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *), options, domain);
}
